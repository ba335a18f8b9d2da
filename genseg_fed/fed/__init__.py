"""Federation building blocks shared by the Flower ServerApp and ClientApp.

``weights``: which tensors travel (segmenter, generator) and which stay on site (discriminator,
optimiser state, optionally normalisation layers); checks of received updates.
``protocol``: the message contents both sides agree on, as Flower records.
``runconfig``: experiment config and site identity from Flower's run and node config.
``site``: a hospital's side of a run (local GenSeg rounds, evaluation, baselines, on-site state).
``runstate``: the coordinator's checkpoint and per-site history.
"""
