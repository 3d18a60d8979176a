# Type stub of the lazily bound public API (see __init__.py): editors and type checkers read the names here.
from inrscrecon import data as data
from inrscrecon import field as field
from inrscrecon import kernels as kernels
from inrscrecon import query as query
from inrscrecon import train as train
from inrscrecon.align import align as align
from inrscrecon.data.io import read_csv_pair as read_csv_pair
from inrscrecon.data.io import read_section as read_section
from inrscrecon.data.io import read_sections as read_sections
from inrscrecon.data.io import write_h5ad as write_h5ad
from inrscrecon.data.preprocess import select_genes as select_genes
from inrscrecon.data.stack import build_cell_table as build_cell_table
from inrscrecon.data.streaming import open_stack as open_stack
from inrscrecon.data.synthetic import SynthConfig as SynthConfig
from inrscrecon.data.synthetic import make_sections as make_sections
from inrscrecon.errors import InputError as InputError
from inrscrecon.evaluate import evaluate as evaluate
from inrscrecon.field.encoding import EncodingConfig as EncodingConfig
from inrscrecon.field.losses import LossConfig as LossConfig
from inrscrecon.field.model import FieldConfig as FieldConfig
from inrscrecon.field.model import INRField as INRField
from inrscrecon.query.grid import GridSpec as GridSpec
from inrscrecon.query.impute import impute_sections as impute_sections
from inrscrecon.query.predict import predict as predict
from inrscrecon.query.predict import predict_anndata as predict_anndata
from inrscrecon.query.render import render as render
from inrscrecon.train.fit import TrainConfig as TrainConfig
from inrscrecon.train.fit import fit as fit

__version__: str
__all__: list[str]
