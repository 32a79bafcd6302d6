"""Carrier adapters: the only code that knows Twilio's or Telnyx's wire formats."""
