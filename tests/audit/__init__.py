"""Tests of the audit log room (service/audit), runnable alone and offline."""
