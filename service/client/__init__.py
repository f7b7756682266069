"""Client SDK for privscore. Imports the generated stubs only, never the model runtime."""
