"""`ray job submit --working-dir . -- python ray_jobs/train.py --config configs/<name>.yaml`."""

from _entry import run

if __name__ == "__main__":
    run("train")
