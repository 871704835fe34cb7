"""Reading EGD-CXR tables and DICOMs, gaze heatmaps, synthetic data, the prepared folder, splits, datasets."""
