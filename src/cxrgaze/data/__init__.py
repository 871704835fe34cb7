"""Reading EGD-CXR tables and DICOMs, gaze heatmaps, synthetic data, splits, datasets."""
