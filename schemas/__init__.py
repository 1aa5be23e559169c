"""attrs request/response/param classes, the one cattrs converter, the error hierarchy."""
