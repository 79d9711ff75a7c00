"""One module per method: MELBO vectors (:mod:`melbo.methods.melbo`), deep causal transcoding
(:mod:`melbo.methods.dct`, fit in :mod:`melbo.methods.dct_fit` on Δ of :mod:`melbo.methods.delta`),
steering adapters (:mod:`melbo.methods.adapter`), MELBO-ortho (:mod:`melbo.methods.ortho`); the
radius calibration (:mod:`melbo.methods.calibrate`) and sweep (:mod:`melbo.methods.radius_sweep`)."""
