"""Loading models by name, the architecture adapter, and prompt encoding shared by everyone."""
