"""`gateway.register` with models nobody in this repository wrote: scikit-learn estimators trained here on
synthetic churn / lifetime-value data with their own feature names, registered, then loaded and served by the
real gateway. Bad inputs must fail before anything is written, naming the field, the value and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import requests
from gateway.register import RegistrationError, register_version
from gateway.registry import ModelRegistry, check_metadata
from gateway.testing import run_gateway

FEATURES = ["tenure_months", "plan_price", "support_tickets"]
REPO = Path(__file__).resolve().parents[2]


def churn_frame(n: int, seed: int) -> pd.DataFrame:
    """Customers and whether they churned (a logistic process of the three features)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "customer_id": [f"c{seed}-{i}" for i in range(n)],
        "tenure_months": rng.integers(1, 72, n),
        "plan_price": rng.uniform(10, 120, n).round(2),
        "support_tickets": rng.poisson(1.5, n),
    })
    logit = -1.0 - 0.05 * df.tenure_months + 0.02 * df.plan_price + 0.6 * df.support_tickets
    df["churned"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    df["ltv"] = (df.plan_price * (df.tenure_months + 6) / (1 + df.support_tickets)).round(2)
    return df


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Artifacts as a user would dump them: a random forest and a naive Bayes fitted on DataFrames (so they
    carry feature_names_in_), a ridge regressor fitted on a bare array (no names), and a held-out CSV."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import Ridge
    from sklearn.naive_bayes import GaussianNB

    out = tmp_path_factory.mktemp("own-artifacts")
    train, holdout = churn_frame(3000, 1), churn_frame(800, 2)
    rf = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0).fit(train[FEATURES], train.churned)
    nb = GaussianNB().fit(train[FEATURES], train.churned)
    ridge = Ridge().fit(train[FEATURES].to_numpy(dtype=float), train.ltv.to_numpy())
    strings = GaussianNB().fit(train[FEATURES], train.churned.map({0: "stays", 1: "leaves"}))
    paths = {"rf": out / "rf.joblib", "nb": out / "nb.joblib", "ridge": out / "ridge.joblib",
             "strings": out / "strings.joblib", "not_a_model": out / "dict.joblib", "holdout": out / "holdout.csv"}
    joblib.dump(rf, paths["rf"])
    joblib.dump(nb, paths["nb"])
    joblib.dump(ridge, paths["ridge"])
    joblib.dump(strings, paths["strings"])
    joblib.dump({"weights": [1, 2, 3]}, paths["not_a_model"])
    holdout.to_csv(paths["holdout"], index=False)
    return paths


def test_classifier_features_inferred_and_metrics_computed(artifacts, tmp_path):
    models = tmp_path / "models"
    meta = register_version(models, "churn", "v1", artifacts["rf"], "classifier", eval_csv=artifacts["holdout"],
                            label_column="churned", description="random forest on three features")
    assert meta["features"] == FEATURES  # from feature_names_in_
    assert meta["kind"] == "classifier" and meta["stage"] == "candidate"
    assert set(meta["eval_metrics"]) == {"accuracy", "auc", "log_loss"}
    assert 0.6 < meta["eval_metrics"]["accuracy"] <= 1 and 0.65 < meta["eval_metrics"]["auc"] <= 1
    assert meta["labels"] == [0, 1] and meta["score_range"] == [0.0, 1.0]
    assert meta["params"]["estimator"] == "RandomForestClassifier" and meta["params"]["n_estimators"] == 30
    assert meta["training_data"]["rows_eval"] == 800 and meta["training_data"]["label_column"] == "churned"
    dry = meta["dry_run"]
    assert dry["prediction"] in (0, 1) and 0 <= dry["score"] <= 1 and set(dry["features"]) == set(FEATURES)
    folder = models / "churn" / "v1"
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.joblib"]
    assert (folder / "model.joblib").read_bytes() == artifacts["rf"].read_bytes()
    on_disk = json.loads((folder / "metadata.json").read_text())
    assert on_disk == meta
    check_metadata(on_disk, "churn", "v1")  # the gateway's own validation
    assert not [p for p in (models / "churn").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_regressor_without_feature_names_needs_features(artifacts, tmp_path):
    models = tmp_path / "models"
    with pytest.raises(RegistrationError, match=r"features=None.*--features a,b,c"):
        register_version(models, "ltv", "v1", artifacts["ridge"], "regressor")
    meta = register_version(models, "ltv", "v1", artifacts["ridge"], "regressor", features=FEATURES,
                            eval_csv=artifacts["holdout"], label_column="ltv", stage="production")
    assert meta["features"] == FEATURES and meta["stage"] == "production"
    assert set(meta["eval_metrics"]) == {"mae", "rmse"} and meta["eval_metrics"]["rmse"] >= meta["eval_metrics"]["mae"]
    assert "labels" not in meta and "score_range" not in meta and meta["dry_run"]["score"] is None


def test_existing_version_is_refused_unless_forced(artifacts, tmp_path):
    models = tmp_path / "models"
    first = register_version(models, "churn", "v1", artifacts["nb"], "classifier")
    with pytest.raises(RegistrationError, match=r"churn/v1 already exists.*new --version.*--force"):
        register_version(models, "churn", "v1", artifacts["rf"], "classifier")
    assert json.loads((models / "churn" / "v1" / "metadata.json").read_text()) == first  # untouched
    replaced = register_version(models, "churn", "v1", artifacts["rf"], "classifier", force=True)
    assert replaced["params"]["estimator"] == "RandomForestClassifier"
    assert (models / "churn" / "v1" / "model.joblib").read_bytes() == artifacts["rf"].read_bytes()
    assert sorted(p.name for p in (models / "churn").iterdir()) == ["v1"]


def test_production_archives_the_previous_production_version(artifacts, tmp_path):
    models = tmp_path / "models"
    register_version(models, "churn", "v1", artifacts["nb"], "classifier", stage="production")
    register_version(models, "churn", "v2", artifacts["rf"], "classifier")
    register_version(models, "churn", "v3", artifacts["rf"], "classifier", stage="production")
    stages = {v: json.loads((models / "churn" / v / "metadata.json").read_text())["stage"] for v in ("v1", "v2", "v3")}
    assert stages == {"v1": "archived", "v2": "candidate", "v3": "production"}
    registry = ModelRegistry(models)
    registry.scan()
    assert registry.production_version("churn") == "v3"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "../etc"}, r"model name '\.\./etc' is not allowed.*pattern"),
        ({"version": "v 2"}, r"version name 'v 2' is not allowed"),
        ({"kind": "ranker"}, r"kind='ranker'.*classifier.*regressor"),
        ({"stage": "archived"}, r"stage='archived'.*candidate.*production"),
        ({"features": ["plan_price", "tenure_months", "support_tickets"]},
         r"disagree with the estimator's feature_names_in_.*--features tenure_months,plan_price,support_tickets"),
        ({"features": ["a", "a", "b"]}, r"\['a'\] listed twice"),
        ({"artifact": "missing.joblib"}, r"artifact='missing.joblib': no such file"),
        ({"artifact": "not_a_model"}, r"neither predict_proba\(\) nor predict\(\)"),
        ({"artifact": "strings"}, r"classes_=\['leaves', 'stays'\].*not numbers.*0/1"),
        ({"kind": "regressor"}, r"has predict_proba.*--kind classifier"),
        ({"artifact": "ridge", "features": FEATURES}, r"neither classes_ nor predict_proba.*--kind regressor"),
        ({"eval_csv": "holdout"}, r"give both --eval-csv and --label-column"),
        ({"eval_csv": "holdout", "label_column": "churn"}, r"missing column\(s\) \['churn'\].*--label-column"),
        ({"eval_csv": "holdout", "label_column": "customer_id"}, r"column 'customer_id' is not numeric"),
        ({"labels": ["no", "yes"]}, r"labels=\['no', 'yes'\]: labels must be numbers"),
        ({"score_range": [1, 0]}, r"score_range=\[1, 0\]: needs lo < hi"),
    ],
)
def test_bad_input_is_refused_naming_field_value_and_fix(artifacts, tmp_path, change, message):
    args = {"model": "churn", "version": "v1", "artifact": "rf", "kind": "classifier"}
    args.update(change)
    for key in ("artifact", "eval_csv"):
        if args.get(key) in artifacts:
            args[key] = artifacts[args[key]]
    models = tmp_path / "models"
    with pytest.raises(RegistrationError, match=message):
        register_version(models, args.pop("model"), args.pop("version"), args.pop("artifact"), args.pop("kind"),
                         **args)
    assert not (models / "churn").exists() or not any((models / "churn").iterdir())  # nothing written


def test_numpy_model_with_wrong_feature_count_is_refused(artifacts, tmp_path):
    with pytest.raises(RegistrationError, match=r"2 names, but the estimator was fitted on 3 columns"):
        register_version(tmp_path, "ltv", "v1", artifacts["ridge"], "regressor", features=["a", "b"])


def test_command_line(artifacts, tmp_path):
    models = tmp_path / "models"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'include'}{os.pathsep}{REPO / 'plugins'}"}
    cmd = [sys.executable, "-m", "gateway.register", "--model-dir", str(models), "--model", "churn",
           "--version", "v1", "--artifact", str(artifacts["rf"]), "--kind", "classifier", "--stage", "production",
           "--eval-csv", str(artifacts["holdout"]), "--label-column", "churned", "--labels", "0,1"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["stage"] == "production" and "registered churn/v1" in ok.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "error: version churn/v1 already exists" in again.stderr, again.stderr


def test_the_gateway_loads_and_serves_registered_versions(artifacts, tmp_path):
    models = tmp_path / "models"
    register_version(models, "churn", "v1", artifacts["nb"], "classifier", stage="production")
    register_version(models, "churn", "v2", artifacts["rf"], "classifier", eval_csv=artifacts["holdout"],
                     label_column="churned")
    register_version(models, "ltv", "v1", artifacts["ridge"], "regressor", features=FEATURES, stage="production")
    row = {"tenure_months": 3, "plan_price": 99.5, "support_tickets": 4}
    with run_gateway(models, f"sqlite:///{tmp_path / 'log.db'}") as gw:
        listing = {m["model"]: {v["version"]: v for v in m["versions"]}
                   for m in requests.get(f"{gw.url}/v1/models", timeout=10).json()["models"]}
        assert {v: d["loadable"] for v, d in listing["churn"].items()} == {"v1": True, "v2": True}
        assert listing["churn"]["v2"]["eval_metrics"]["auc"] > 0.65 and listing["ltv"]["v1"]["features"] == FEATURES
        answer = requests.post(f"{gw.url}/v1/models/churn/predict", json={"unit_id": "c1", "features": row},
                               timeout=10).json()
        assert answer["version"] == "v1" and answer["prediction"] in (0, 1) and 0 <= answer["score"] <= 1
        assert gw.set_route("churn", stable="v1", canary="v2", canary_percent=100, lease_seconds=60).status_code == 200
        canary = requests.post(f"{gw.url}/v1/models/churn/predict", json={"unit_id": "c1", "features": row},
                               timeout=10).json()
        assert canary["version"] == "v2" and canary["arm"] == "canary"
        value = requests.post(f"{gw.url}/v1/models/ltv/predict", json={"features": row}, timeout=10).json()
        assert isinstance(value["prediction"], float) and value["score"] is None
        missing = requests.post(f"{gw.url}/v1/models/churn/predict", json={"features": {"plan_price": 1}},
                                timeout=10)
        assert missing.status_code == 422 and "tenure_months" in missing.text


def test_a_class_from_the_training_script_is_refused_with_the_fix(tmp_path):
    """The classic pickle trap: a wrapper class defined in the training script lives in `__main__` and cannot
    be loaded by any other process (register, gateway). The error says how to fix it."""
    script = tmp_path / "train.py"
    script.write_text("import joblib\n\nclass Threshold:\n    def predict(self, x):\n"
                      "        return [float(row[0] > 3) for row in x]\n\n"
                      f"joblib.dump(Threshold(), {str(tmp_path / 'wrapped.joblib')!r})\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    with pytest.raises(RegistrationError, match=r"defined in the training script itself.*move it into a module"):
        register_version(tmp_path / "models", "tickets", "v1", tmp_path / "wrapped.joblib", "regressor",
                         features=["support_tickets"])
