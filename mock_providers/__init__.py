"""Mock MTN MoMo and Airtel Money provider services for local runs and tests."""
