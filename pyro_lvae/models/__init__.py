"""The model families: the generative model of the paper's eq. 1, its two guides, the
precision-weighted merge (eq. 15-17), the network blocks, the VLAE and VQ-VAE families,
and the contract every family meets (:mod:`pyro_lvae.models.protocol`)."""
