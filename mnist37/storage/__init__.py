"""Where mnist37 reads and writes: the storage layer, for local paths and object-store URIs alike.

- `locations`: a local path or a URI, the one gate against credentials in a URI
  (`secret_part`), the cache folder, and how the job reaches its object store (`StoreSettings`).
- `files`: reading a data set's files, local files and objects through one set of functions.
- `objects`: object stores: listing a prefix, reading many objects at once, writing one whole.
- `retries`: object-store requests tried again where pyarrow does not (`retrying`).
- `partials`: temporaries of writers, held under a lock, cleaned once their writer is gone.
- `writes`: `publish`, the one way a file (and `publish_folder`, a folder) is written
  atomically; a refused write as one line naming the folder and errno (`writing`).
"""
