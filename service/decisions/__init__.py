"""Decision policies and their state: limit policy, alert rules, the alert stream."""
