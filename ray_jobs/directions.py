"""`ray job submit --working-dir . -- python ray_jobs/directions.py --config configs/langevin_disco.yaml`."""

from _entry import run

if __name__ == "__main__":
    run("directions")
