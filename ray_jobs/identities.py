"""`ray job submit --working-dir . -- python ray_jobs/identities.py --config configs/langevin_disco.yaml`."""

from _entry import run

if __name__ == "__main__":
    run("identities")
