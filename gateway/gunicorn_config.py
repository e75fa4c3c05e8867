"""gunicorn settings shared by `rungateway`, the Dockerfile and docker-compose
(``gunicorn -c python:gateway.gunicorn_config``)."""

accesslog = "-"
# The request line without its query string, and no Referer or user agent: list filters
# carry patient names and IDs (``/worklist/?patient=...``), which stay out of the logs.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
