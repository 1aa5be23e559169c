"""The Litestar service: app factory, controllers, providers, telemetry, watchdog."""
