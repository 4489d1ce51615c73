"""The meta-dataset of past compressions and the meta-predictor: features, collection, training, evaluation."""
