"""What several studies share: scaled data sets (`replicate`) and child processes whose peak
RSS is their own (`processes.fresh_process`). Lab support, not the product, and not test support
(that is tests/: `tests.ray_heads`, `tests.s3server`, `tests.conftest`)."""
