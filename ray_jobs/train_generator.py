"""`ray job submit --working-dir . -- python ray_jobs/train_generator.py --config configs/cemiface.yaml`."""

from _entry import run

if __name__ == "__main__":
    run("train-generator")
