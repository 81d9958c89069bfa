"""Operating it: the admin site, status views, metrics, logs, runtime control and l4router-ctl."""
