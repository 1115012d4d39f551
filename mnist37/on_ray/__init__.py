"""mnist37 on Ray: the one package that uses Ray, by concern.

    probe       the address the job would join, checked and probed before `ray.init`
    session     connecting (or starting a Ray of the job's own), watching the head and the
                raylet, the cluster's facts, leaving (`connect`, `join_this_process`, `disconnect`)
    scheduling  the bounded map of tasks: every wait bounded and watched, tasks submitted again
                after a node's loss, failures as one line
    tasks       the listing, decode and classify tasks, each taking one request record, and
                `RayExecutor`, the evaluation's executor on Ray

The numeric core runs without it (mnist37.steps.InProcess). Names with a leading underscore
are shared between these modules only. Named `on_ray`, not `ray`: a package `ray` inside
mnist37 would be found by `import ray` wherever mnist37/ itself is on sys.path (a module of it
run as a script, `python mnist37/job.py`), in place of Ray.
"""
