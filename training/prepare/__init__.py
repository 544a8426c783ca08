"""Turn fetched public mirrors (bare git snapshots) into the formats `training.datasets` reads.

`mirror` lists and reads blobs of a bare git directory; one module per data set
(`coco`, ...) maps its sources to a reader layout. Data is written outside the repository.
"""
