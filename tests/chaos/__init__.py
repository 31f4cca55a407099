"""Chaos under load: supervisord-managed stacks with workers and brokers SIGKILLed."""
