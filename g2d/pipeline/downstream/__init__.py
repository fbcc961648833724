"""The three downstream task families (segmentation, linear probe, detection), each a module with the
same four functions: `wrap` (network around a U-Net), `fit`, `evaluate` and `figure`."""
