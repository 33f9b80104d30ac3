"""`ray job submit --working-dir . -- python ray_jobs/identities.py --config configs/disco.yaml`."""

from _entry import run

if __name__ == "__main__":
    run("identities")
