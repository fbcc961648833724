"""The datasets the other stages read, made from the sources in data/.

- synth.py, the `synth` stage (`g2d data synth`): renders SynthCXR from the embedded sources
  (data/*.tgz, *.zip, *.csv.gz) into datasets/synthcxr, with contact sheets, and writes metrics/data.json;
- data_import.py (`g2d data import`): a downloaded dataset in its official layout becomes a validated
  dataset folder (manifest, images, dataset.json, import report) by its split protocol;
- import_sheet.py: the imported dataset's contact sheet, its annotations drawn on the stored images.

Both record an MLflow run of the `g2d-data` experiment with each dataset logged as an input.
"""
