"""`ray job submit --working-dir . -- python ray_jobs/ingest.py --config configs/ingest.yaml --images DIR`."""

from _entry import run

if __name__ == "__main__":
    run("ingest")
