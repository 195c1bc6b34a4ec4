"""One reader per dataset: original files -> :class:`~mtlue_fast.data.records.Records`."""

from . import celeba, chestxray, nyuv2, utkface

READERS = {"celeba": celeba.read, "chestxray": chestxray.read, "utkface": utkface.read, "nyuv2": nyuv2.read}
