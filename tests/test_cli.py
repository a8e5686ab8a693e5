"""The ``casc`` command as a new user meets it: a fast ``--help``, Ultralytics' ``key=value`` form, defaults in
every help, one-line errors that say what to install or pass, and ``casc predict``'s options."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from casc.cli import HelpFormatter, build_parser, expand_key_values, install_hint, main
from detector.data import ensure_bundled
from detector.predict import find_sources, is_stream, split_classes

ROOT = Path(__file__).resolve().parent.parent
VAL = ensure_bundled() / "images" / "val"


def test_casc_help_is_fast_and_imports_neither_torch_nor_ultralytics():
    code = ("import sys, time; t = time.perf_counter(); from casc.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(time.perf_counter() - t, 'torch' in sys.modules, 'ultralytics' in sys.modules, file=sys.stderr)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    seconds, torch_loaded, ultralytics_loaded = done.stderr.split()
    assert "predict" in done.stdout and "key=value" in done.stdout
    assert (torch_loaded, ultralytics_loaded) == ("False", "False")
    assert wall < 1.5, f"casc --help took {wall:.2f} s"


def test_the_library_names_still_import_lazily():
    import detector

    assert detector.convert.__name__ == "convert" and "quantize" in dir(detector)
    code = ("from detector import quantize\nimport detector.runtime, detector.convert\nfrom detector import convert\n"
            "assert callable(convert) and convert.__module__ == 'detector.convert', convert")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        detector.nothing  # noqa: B018


def _parser(*argv):
    parser = build_parser(list(argv))
    return parser._subparsers._group_actions[0].choices[argv[0]]


def test_key_value_arguments_become_options():
    predict = _parser("predict")
    assert expand_key_values(predict, ["model=yolov8n-bundled", "source=a.jpg", "conf=0.4", "save_txt=True",
                                       "save=False", "exist_ok=false", "imgsz=320", "b=c.jpg", "--iou", "0.5"]) == \
        ["--model", "yolov8n-bundled", "a.jpg", "--conf", "0.4", "--save-txt", "--no-save", "--imgsz", "320",
         "b=c.jpg", "--iou", "0.5"]
    with pytest.raises(ValueError, match="save_txt is a switch; give save_txt=True or save_txt=False"):
        expand_key_values(predict, ["save_txt=maybe"])
    args = predict.parse_args(expand_key_values(predict, ["model=m", "source=0", "vid_stride=2", "project=p", "name=n"]))
    assert (args.model, args.sources, args.vid_stride, args.project, args.name) == ("m", ["0"], 2, "p", "n")


def test_val_is_eval_and_every_command_has_a_description():
    assert _parser("val", "--help").description.startswith("mAP against time steps")
    for command in ("demo", "fidelity", "train", "plot", "export", "quantize", "predict", "serve"):
        assert _parser(command).description, command


@pytest.mark.parametrize("argv", [["train", "yolo"], ["train", "rcnn"], ["predict"], ["eval"], ["quantize"],
                                  ["serve"]])
def test_help_shows_each_default_once(argv):
    parser = build_parser(argv)
    for token in argv:
        parser = next(a.choices for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))[token]
    assert parser.formatter_class is HelpFormatter
    if argv[0] == "train":
        assert "(default: 4)" in " ".join(parser.format_help().split())  # --levels
    for action in parser._actions:
        help_text = HelpFormatter("casc")._get_help_string(action)
        assert help_text.count("default:") + help_text.count("default ") <= 1 + help_text.count("the default"), \
            (argv, action.option_strings, help_text)
        if action.option_strings and action.default not in (None, False, "==SUPPRESS=="):
            assert "default" in help_text or "None:" in help_text, (argv, action.option_strings)


def test_a_missing_extra_is_one_line_that_names_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "yolov8n-bundled"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 'service' extra: pip install -e '.[service]'" in err and "uvicorn" in err
    assert "pip install --no-deps 'ultralytics==" in install_hint(ModuleNotFoundError(name="ultralytics"))
    assert "onnx" in install_hint(ModuleNotFoundError(name="onnxruntime.capi"))


def test_train_with_a_missing_data_yaml_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a bare name, which Ultralytics would look up in its datasets folder and download
    for data in ("missing.yaml", str(tmp_path / "missing.yaml")):
        assert main(["train", "yolo", "--data", data, "--epochs", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"not found: {data}; give the path of an Ultralytics data.yaml" in err
    assert not (tmp_path / "runs").exists()  # no run folder for a run that never started


def test_training_runs_are_numbered_like_ultralytics(tmp_path):
    from detector.train.recipe import output_folder

    for family in ("yolo", "rcnn"):
        train = build_parser(["train", family])._subparsers._group_actions[0].choices["train"]
        family_parser = train._subparsers._group_actions[0].choices[family]
        args = family_parser.parse_args(["--data", "d.yaml", "--project", str(tmp_path / family)])
        assert [output_folder(args).name for _ in range(2)] == [args.name, f"{args.name}2"]
        args.exist_ok = True
        assert output_folder(args).name == args.name
        args.out = str(tmp_path / "exact")
        assert output_folder(args) == tmp_path / "exact"


def test_no_ultralytics_settings_banner_on_first_use(tmp_path):
    code = "from detector.models.yolo import prepare_ultralytics; prepare_ultralytics()"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CASC_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "yolo settings" not in done.stdout + done.stderr
    assert (tmp_path / "cache" / "ultralytics" / "Ultralytics" / "settings.json").is_file()


def test_classes_then_sources_and_stream_sources(tmp_path):
    assert split_classes(["1", "5", "img.jpg"]) == ([1, 5], ["img.jpg"])
    assert split_classes(["1,5"]) == ([1, 5], [])
    assert split_classes(None) == (None, [])
    with pytest.raises(ValueError, match="expected class ids"):
        split_classes(["cat"])
    assert is_stream("0") and is_stream("rtsp://camera/live") and is_stream("https://host/stream.m3u8")
    (tmp_path / "7").write_text("")
    assert not is_stream(str(tmp_path / "7")) and not is_stream("bus.jpg")
    assert find_sources(["0", "rtsp://camera/live"]) == ["0", "rtsp://camera/live"]
    with pytest.raises(ValueError, match="no SOURCE given"):
        find_sources([])


def test_predict_as_a_new_user_runs_it(tmp_path, capsys):
    """--no-save writes nothing; an unreadable image is named and skipped; --classes before a source; key=value;
    --exist-ok; --threads; an .onnx --model without its export folder and a dead stream get one-line errors."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("000000.jpg", "000001.jpg"):
        (src / name).write_bytes((VAL / name).read_bytes())
    (src / "broken.jpg").write_text("not an image")
    project = tmp_path / "runs"
    assert main(["predict", "--model", "yolov8n-bundled", "--classes", "1", "5", str(src), "--no-save",
                 "--threads", "1", "--project", str(project)]) == 1
    out, err = capsys.readouterr()
    assert not project.exists() and "Results saved" not in out
    assert "image 1/3" in out and "image 2/3" in out
    assert f"skipped {src / 'broken.jpg'}: not a readable image" in err
    assert main(["predict", "model=yolov8n-bundled", f"source={src / '000000.jpg'}", f"project={project}",
                 "exist_ok=True", "save_json=True", "imgsz=320"]) == 0
    assert main(["predict", "model=yolov8n-bundled", f"source={src / '000001.jpg'}", f"project={project}",
                 "exist_ok=True"]) == 0
    assert sorted(p.name for p in (project / "exp").iterdir()) == ["000000.jpg", "000001.jpg", "json"]
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "step.onnx"), str(src)]) == 2
    assert main(["predict", "--model", "yolov8n-bundled", "rtsp://127.0.0.1:9/none", "--project", str(project)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "run `casc export` first" in err[0] and "cannot open the webcam or stream" in err[1]


def test_serve_explains_every_option_and_serves_a_demo_image_by_default():
    serve = _parser("serve")
    assert not [a.option_strings for a in serve._actions if a.option_strings and not a.help]
    text = " ".join(serve.format_help().split())
    assert "(default: 127.0.0.1)" in text and "(default: 8000)" in text
    assert serve.parse_args([]).demo_image == str(VAL / "000000.jpg")
