"""Running genseg-fed as a real multi-hospital Flower deployment (guide: deploy/README.md).

* ``certs``: the federation's CA, the SuperLink's TLS certificate, the hospitals' SuperNode keys.
* ``launch``: validated ``flower-superlink`` / ``flower-supernode`` command lines, the offline
  environment, the ``flwr`` CLI connection, run submission and status.
* ``cli``: the ``genseg-fed certs | superlink | supernode | submit | status`` subcommands.
* ``supernode``: a hospital's SuperNode with a shorter idle poll, the warm runner next to it and a
  clean restart after a crash.
* ``runner``: the warm ClientApp runner (torch imported once per SuperNode, one fork per message).
* ``local``: a whole TLS federation on this machine's loopback (integration tests, benchmark).
* ``demo``: synthetic site folders to try a deployment.
"""
