-- The role and the two databases of the many-machine recipe (README "Many machines"), run once
-- by the database superuser on the database host, with the role's password in DB_PASSWORD:
--   sudo --preserve-env=DB_PASSWORD -u postgres psql -v ON_ERROR_STOP=1 < deploy/postgres.sql
-- (from the environment, not the command line, so that `ps` does not show it). The password is
-- stored as a SCRAM hash (PostgreSQL's default password_encryption since 14).
\getenv password DB_PASSWORD
CREATE ROLE mnist_opt LOGIN PASSWORD :'password';
CREATE DATABASE optuna OWNER mnist_opt;
CREATE DATABASE mlflow OWNER mnist_opt;
