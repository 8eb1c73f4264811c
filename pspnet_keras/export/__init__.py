"""A PSPNet written for deployment, and the file checked in the runtime it is made for.

Every format holds the network pspnet.py runs (layers_builder.build_pspnet with the
model's weights) at the model's crop size S: float32 (N, S, S, 3) crops in BGR order
with the model's mean subtracted in, float32 (N, S, S, classes) logits out; the
LiteRT file takes one crop at a time. The SavedModel adds a `segment` signature that
runs pspnet.py's default protocol (pspnet_keras/inference.py) on one uint8 RGB image
of any size.

- formats.py: the formats, the names of the exported inputs and outputs, ExportError;
- graph.py: the default protocol as a TensorFlow graph (the `segment` signature);
- writers.py: one writer per format (Keras, SavedModel, tf2onnx, the LiteRT converter);
- runtimes.py: each file opened in its runtime (Keras, TensorFlow, ONNX Runtime, the
  LiteRT interpreter), its logits on a random crop compared with the Keras network's;
- transaction.py: `export`, which writes the file (and the model's description) in a
  staging folder beside the target, checks it and swaps it in for what was there, or
  leaves everything as it was.

formats.py and runtimes.py import nothing heavy, so that export.py parses its
command line and checks its files before TensorFlow loads.
"""
