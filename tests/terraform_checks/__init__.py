"""Helpers of tests/test_terraform.py: the parsed HCL, the tools kept out of the project venv."""
