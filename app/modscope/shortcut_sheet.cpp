#include "shortcut_sheet.h"

#include <QAction>
#include <QDialogButtonBox>
#include <QHeaderView>
#include <QTableWidget>
#include <QVBoxLayout>

namespace modscope {

ShortcutSheet::ShortcutSheet(const QList<QAction*>& actions, const QList<QPair<QString, QString>>& extra,
                             QWidget* parent)
    : QDialog(parent) {
    setWindowTitle(tr("Keyboard Shortcuts"));
    auto* layout = new QVBoxLayout(this);
    auto* table = new QTableWidget(0, 2, this);
    table->setHorizontalHeaderLabels({tr("Keys"), tr("Action")});
    table->verticalHeader()->setVisible(false);
    table->horizontalHeader()->setSectionResizeMode(0, QHeaderView::ResizeToContents);
    table->horizontalHeader()->setSectionResizeMode(1, QHeaderView::Stretch);
    table->setEditTriggers(QAbstractItemView::NoEditTriggers);
    table->setSelectionMode(QAbstractItemView::NoSelection);
    auto add = [&](const QString& keys, const QString& what) {
        const int row = table->rowCount();
        table->insertRow(row);
        auto* k = new QTableWidgetItem(keys);
        QFont f = k->font();
        f.setBold(true);
        k->setFont(f);
        table->setItem(row, 0, k);
        table->setItem(row, 1, new QTableWidgetItem(what));
    };
    for (QAction* a : actions) {
        if (a->shortcuts().isEmpty()) continue;
        QStringList keys;
        for (const auto& s : a->shortcuts()) keys << s.toString(QKeySequence::NativeText);
        add(keys.join(QStringLiteral("  or  ")), a->text().remove(QLatin1Char('&')).remove(QStringLiteral("...")).remove(QChar(0x2026)));
    }
    for (const auto& [keys, what] : extra) add(keys, what);
    layout->addWidget(table);
    auto* buttons = new QDialogButtonBox(QDialogButtonBox::Close, this);
    connect(buttons, &QDialogButtonBox::rejected, this, &QDialog::reject);
    layout->addWidget(buttons);
    resize(560, 620);
}

}  // namespace modscope
