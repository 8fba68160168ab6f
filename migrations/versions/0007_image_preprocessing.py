"""image preprocessing: models.preprocessing, the input preprocessing of an image model's training data

Revision ID: 0007
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('preprocessing', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('preprocessing')
