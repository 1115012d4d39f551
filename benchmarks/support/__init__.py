"""What several studies share: scaled data sets (`replicate`), child processes whose peak
RSS is their own (`processes.fresh_process`) and a command line's exit status (`cli.exit_status`). Lab support, not the product, and not test support
(that is tests/: `tests.ray_heads`, `tests.s3server`, `tests.conftest`)."""
