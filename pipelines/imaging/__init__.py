"""Images as arrays: Spark's image struct, resizing and channels, contact sheets, augmentation."""
