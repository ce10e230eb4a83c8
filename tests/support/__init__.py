"""Test doubles and row builders shared by tests and benches; never imported by the package."""
