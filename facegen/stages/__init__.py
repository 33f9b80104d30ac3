"""Ray-facing orchestration of each stage over block files (the stage logic lives in its module)."""
