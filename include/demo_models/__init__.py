"""Demo models for the canary rollouts: a fraud classifier (four versions) and a delivery-time regressor.

`demo_models.data` generates features and true labels from a known process (used by training and by the traffic
simulator); `demo_models.train` writes the model directory; `demo_models.wrappers` holds the pickled wrappers.
"""
