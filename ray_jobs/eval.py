"""`ray job submit --working-dir . -- python ray_jobs/eval.py --checkpoint DIR --bin lfw.bin ...`."""

from _entry import run

if __name__ == "__main__":
    run("eval")
