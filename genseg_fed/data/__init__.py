"""Site data for genseg-fed: readers, deterministic splits and mask augmentation.

Every reader returns a :class:`SiteData` with images ``(N, C, S, S)`` float32 in ``[-1, 1]`` and
masks ``(N, 1, S, S)`` float32 in ``{0, 1}``::

    data = load_site(spec, image_size=64, channels=1, empty_masks="error")
    split = split_site(data, n_train=9, n_val=3, test_fraction=0.4, seed=0)
    augment = Augmenter(cfg.augment, seed=0)

Sources (``SiteSpec.source``): ``folder`` (:mod:`.folder`), ``npz`` (:mod:`.npz`) and the embedded
default ``mni152`` (:mod:`.mni152`, real MRI template with a *simulated* acquisition shift).
"""

from __future__ import annotations

from genseg_fed.data.augment import Augmenter
from genseg_fed.data.folder import write_site_folder
from genseg_fed.data.mni152 import PROFILES, AcquisitionProfile
from genseg_fed.data.site import DataError, SiteData
from genseg_fed.data.sources import READERS, load_site
from genseg_fed.data.splits import SiteSplit, split_for_training, split_site, training_split

__all__ = [
    "PROFILES",
    "READERS",
    "AcquisitionProfile",
    "Augmenter",
    "DataError",
    "SiteData",
    "SiteSplit",
    "load_site",
    "split_for_training",
    "split_site",
    "training_split",
    "write_site_folder",
]
