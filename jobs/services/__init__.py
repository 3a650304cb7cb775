"""Everything that changes a Job, a module per domain; callers import the module they need
(`from jobs.services import lifecycle`, then `lifecycle.job_cancel(...)`).

Status moves only here, and only from the expected state: each action is one conditional UPDATE through
transitions.transition (`filter(pk=..., status__in=FROM).update(status=TO, ...)`), whose row count says whether
it happened; the table in transitions says which statuses each action moves a job from and to. A late
message from a killed or cancelled task therefore changes nothing. The form view, the API, the admin and
the workers' tasks call these same functions.

- submissions: job_submit (policy, then the submission check, then the queue), job_retry, job_clone.
- policy: the operator's limits: priority cap, creation rate, active jobs, stored bytes (user_quota).
- lifecycle: a run's side (start, progress, finish, fail, discard its output) and the owners' and operators'
  (cancel, delete, set_priority).
- recovery: runs whose worker vanished (the reaper, job_worker_lost) and queued jobs whose message was lost
  or whose node went offline (the sweeper, the reroute).
- retention: what expires (artifacts_expire), files without rows and rows without files (orphans), stale
  partial checkpoints.
- storage: a job's folders and files, uploaded calibration datasets.
- broker: a job's message on Redis (send, send again, what the broker holds).
- job_log: a job's log lines.
- tokens: API tokens.
- transitions: the state table; errors: JobStateError.
"""
