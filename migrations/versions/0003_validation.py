"""early stopping by validation: checkpoints.val_score, jobs.best_checkpoint_id

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('val_score', sa.Float(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('best_checkpoint_id', sa.String(length=32), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('best_checkpoint_id')
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('val_score')
