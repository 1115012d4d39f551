"""The lab tools (one-off studies, the seed-versus-job benchmark): a package only so that a
study can import `benchmarks.support` once its script has put the checkout's root on sys.path.
Not installed with mnist37 (benchmarks/README.md)."""
