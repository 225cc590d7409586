"""Scripted calls and load tests: a bridge driven the way Twilio drives it, measured."""
