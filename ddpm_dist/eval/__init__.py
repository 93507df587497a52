"""Measuring samples: feature statistics and Fréchet distances (FID), reconstruction metrics, the digits
classifier used as a feature extractor for the embedded data set."""
