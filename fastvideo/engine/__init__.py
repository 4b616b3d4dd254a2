"""The engine: EngineCore (scheduler + executor on one thread), start-up, outputs."""
