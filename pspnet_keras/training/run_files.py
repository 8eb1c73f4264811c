"""The files a training run keeps in its output directory OUT (train.py --out).

run.json: the settings the run was started with (train.py); checkpoint.h5: the
state it resumes from (checkpoint.py); log.csv and tensorboard/: a row and scalars
per iteration (run_log.py); final.h5 with final.json beside it: the trained
inference network and its description (loop.py).
"""

RUN_RECORD_NAME = "run.json"
CHECKPOINT_NAME = "checkpoint.h5"
LOG_NAME = "log.csv"
TENSORBOARD_DIR = "tensorboard"
# The trained model's name, and the stem of its weights file and description.
FINAL_STEM = "final"
FINAL_WEIGHTS_NAME = f"{FINAL_STEM}.h5"
FINAL_DESCRIPTION_NAME = f"{FINAL_STEM}.json"
# Every file a run writes in OUT, and the names of the files it writes in OUT/tensorboard/: TensorFlow's
# event files (tf.summary.create_file_writer, "events.out.tfevents.<time>.<host>...").
RUN_FILE_NAMES = (RUN_RECORD_NAME, CHECKPOINT_NAME, LOG_NAME, FINAL_WEIGHTS_NAME, FINAL_DESCRIPTION_NAME)
EVENT_FILE_PREFIX = "events.out.tfevents."
