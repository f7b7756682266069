"""Security room: dev certificates, caller identity, authorisation policy and call limits."""
