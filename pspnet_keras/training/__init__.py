"""Training PSPNet with the paper's recipe: the pieces train.py is made of, importable.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, and hszhao/semseg (the
authors' re-implementation: config/*/*_pspnet*.yaml, util/transform.py,
model/pspnet.py, tool/train.py). One module per concern:

- recipe.py: the paper's numbers and a run's Settings (no TensorFlow; train.py's --help shows them);
- loss.py: softmax cross-entropy plus 0.4 x the auxiliary classifier's, unlabelled
  pixels (255) left out (paper §3.4 and §5.1);
- network.py: PSPNet with the auxiliary classifier on stage 4, per-sample dropout,
  frozen or trained BN, the training step (`build_training_model`);
- optimizer.py: Caffe's SGD with momentum, L2 decay in the gradient, the "poly"
  learning rate and the new layers at 10x (paper §4; `recipe_optimizer`);
- augment.py: random scale, rotation, blur, mirror and crop (paper §4; util/transform.py);
- data.py: the samples' check, their order and the tf.data pipeline (`training_dataset`);
- init_weights.py: the model and the weights training starts from (train.py --init);
- checkpoint.py: the run's state in one HDF5 file, resumable;
- run_record.py: OUT/run.json, the settings a run started with, checked field by field on --resume;
- run_log.py: OUT/log.csv and the TensorBoard scalars;
- distribute.py: the replicas of a run (TF_CONFIG's workers, the GPUs), the chief;
- loop.py: `Trainer`, the loop of train.py (checkpoints, logs, validation, interruption);
- run_files.py and errors.py: the names of a run's files in OUT, and its errors.

Import each from its module (README.md, "Train on your own data", has an example).
"""
