"""SGLang backend: server launcher, async HTTP client, and the engine with disk / distributed / tensor weight sync."""
